"""The switch node: gRPC servicers over the payment processor.

``records`` holds what the store returns, ``ports`` the interfaces the processor needs
(store, bank gateway, registry), ``processor`` the payment path itself, ``convert``
protobuf <-> domain, ``servicers`` the thin gRPC layer, ``server`` the process.
"""
