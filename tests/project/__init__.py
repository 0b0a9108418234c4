"""Framework-free core (mugv/): configs, FLOPs, random numbers, schema, the import graph."""
