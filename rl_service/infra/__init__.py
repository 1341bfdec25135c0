"""Infrastructure: settings, persistence, files on disk, logging."""
