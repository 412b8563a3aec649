import logging
from Server import SecureTCPServer

# Configure logging
logging.basicConfig(
    level=logging.INFO,
    format='%(asctime)s - %(name)s - %(levelname)s - %(message)s'
)

# Create server without display
server = SecureTCPServer(
    host="0.0.0.0",
    port=8436,
    use_display=False,  # Disable Rich UI
    logger=logging.getLogger('SecureTCPServer')
)

server.initialize()
server.start()
