"""Files: safe tensor reads, checkpoint layouts and the one DiT loader, fp8 storage, saved prompt encodings."""
