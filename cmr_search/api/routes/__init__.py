"""One router per resource, each with its tags: ``health``, ``search``, ``studies``, ``heads``,
``clusters``, and the ``page``; ``cmr_search.api.app`` includes them in this order."""
