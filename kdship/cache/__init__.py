"""kdship cache: run the teacher once and write its distributions to a Zarr store."""
