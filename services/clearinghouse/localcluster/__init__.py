"""The local three-city cluster: real etcd and real Apache Cassandra on loopback.

``paths`` says where state and caches live, ``procs`` starts and signals detached
processes, ``etcd`` and ``cassandra`` render each server's configuration from the
topology, ``schema`` applies the keyspace idempotently, and ``cluster`` ties them into
the operations that ``clearingctl cluster`` exposes.
"""
