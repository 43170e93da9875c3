"""TLS material shared by every listener: the generated private CA and server certificate
(:mod:`amaters.tls.certs`) and the server context options with hot certificate swapping
(:mod:`amaters.tls.context`)."""
