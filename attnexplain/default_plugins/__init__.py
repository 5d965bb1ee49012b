"""attnexplain's own plugins, registered through the same entry point as anyone else's."""
