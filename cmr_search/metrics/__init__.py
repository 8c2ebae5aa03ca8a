"""Pure metrics: retrieval, statistics (AUROC, DeLong), prediction metrics, clustering."""
