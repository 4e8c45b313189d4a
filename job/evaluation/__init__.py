"""The evaluation stage: generate SQL, extract it, execute it in a sandbox, score it and report it."""
