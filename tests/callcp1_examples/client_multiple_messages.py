from Client import SecureTCPClient

client = SecureTCPClient(host="localhost", port=8436)
client.connect()

try:
    # Send multiple messages
    messages = [
        b"Message 1",
        b"Message 2",
        b"Message 3"
    ]
    
    for msg in messages:
        response = client.send_message(msg)
        print(f"Sent: {msg.decode()}, Received: {response.decode()}")
        
finally:
    client.disconnect()
