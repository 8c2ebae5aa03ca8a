"""The FastAPI search service and its web page."""
