"""Staging local input files where the API can fetch them: ``s3.py``, in the user's S3-compatible store."""
