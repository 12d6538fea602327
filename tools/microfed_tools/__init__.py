"""microfed command-line tools (flash, deploy, provision, mesh, audit)."""
