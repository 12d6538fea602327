"""microfed host side: numpy fast paths, cross-check, coordinator."""
