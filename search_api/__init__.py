"""The FastAPI search service and its web page (issue 6)."""
