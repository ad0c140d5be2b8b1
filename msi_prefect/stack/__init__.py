"""The embedded local stack: Tansu broker, SeaweedFS S3 store, Prefect server and worker."""
