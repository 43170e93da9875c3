from twisted.application.service import ServiceMaker

amaters = ServiceMaker("AmateRS", "amaters.tap", "amaters encrypted key-value database server", "amaters")
