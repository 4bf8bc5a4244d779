"""tcpgc: a TCP gender changer.

A Listen-Listen node (:class:`tcpgc.ll.node.ListenNode`) outside a firewall accepts clients
and agents; a Connect-Connect node (:class:`tcpgc.cc.node.ConnectNode`) inside dials out to
it and to the inside servers, and the two relay each client to its server.
"""

__version__ = "0.1.1"
