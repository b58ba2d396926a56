"""What is on disk: the Layout of a store folder, the expert store and the version folders."""
