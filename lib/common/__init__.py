"""Pieces every stage uses: errors and exit codes, atomic files, settings, command lines, devices,
pictures. Nothing here imports another ``lib`` package."""
