"""Rentals on the node: disks, SSH host keys, the rental image. Standard library only."""
