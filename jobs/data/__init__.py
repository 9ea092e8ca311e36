"""Data sets: storage (local or S3), loading and cleaning, splits."""
