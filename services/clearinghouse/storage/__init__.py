"""Cassandra access: one connection factory, versioned schema, and (later) the ledger.

Driver exceptions are converted to domain errors at this boundary and nowhere else.
"""
