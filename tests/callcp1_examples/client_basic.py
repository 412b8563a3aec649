from Client import SecureTCPClient

# Create client instance
client = SecureTCPClient(
    host="localhost",    # Server address
    port=8436,          # Server port
    use_display=True    # Optional: Enable Rich console UI
)

# Connect to server (performs handshake automatically)
client.connect()

# Send message and receive response
message = b"Hello, Server!"
response = client.send_message(message)
print(f"Server response: {response.decode('utf-8')}")

# Disconnect
client.disconnect()
