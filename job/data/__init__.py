"""The data stage: sources, splits, chat-template prompts and tokenized training rows."""
