"""Parameter-efficient fine-tuning of LLMs for text-to-SQL, evaluated by executing the SQL it writes."""

__version__ = "0.1.0"
