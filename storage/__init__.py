"""What the app keeps on disk for its users: conversations (``storage.conversations``)."""
