from Server import SecureTCPServer; from Client import SecureTCPClient; print('Installation successful')
