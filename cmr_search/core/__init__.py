"""Ground floor: domain errors, settings, the progress bar and the store layout. Imports nothing of cmr_search."""
