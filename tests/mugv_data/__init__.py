"""Data preparation (mugv_data) and the shard loader (mugv.data)."""
