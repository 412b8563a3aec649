from Server import SecureTCPServer

def custom_message_handler(message: bytes) -> bytes:
    processed = message.decode('utf-8').upper()
    response = f"Processed: {processed}"
    return response.encode('utf-8')

# Create server with custom handler
server = SecureTCPServer(
    host="0.0.0.0",
    port=8436,
    message_callback=custom_message_handler,
    use_display=False  # Disable UI for production
)

server.initialize()
server.start()
