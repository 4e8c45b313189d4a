"""After training: export a merged model, check adapters for serving engines, ask a run's model, compare runs."""
