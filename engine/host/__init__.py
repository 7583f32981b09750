"""What a dashboard host keeps for itself: the folders it finds profiles and specs in and writes logs to."""
