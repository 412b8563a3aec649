from Server import SecureTCPServer

# Create server instance
server = SecureTCPServer(
    host="0.0.0.0",      # Listen on all interfaces
    port=8436,           # Port number
    use_display=True     # Optional: Enable Rich console UI
)

# Initialize (loads or generates RSA keys)
server.initialize()

# Start server (blocks until interrupted)
server.start()
