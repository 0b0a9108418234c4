"""Sharding over the (data, fsdp, tensor, context) mesh: the mesh, the logical-axis rule table, attention kernels and
context parallelism, multi-host set-up.
"""
