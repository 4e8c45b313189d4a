"""Storage: local and S3 objects, run folders, manifest-last publishing, fetching published runs."""
