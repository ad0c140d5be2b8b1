"""msi_prefect: move laboratory data files through Apache Kafka as a Prefect 3 integration."""

__version__ = "0.1.0"
