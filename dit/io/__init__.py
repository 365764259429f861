"""Files: our checkpoints and their checksums (checkpoint.py, with the checkpoint error types of
errors.py), the official and SiT release files (release.py), export to diffusers and hub folders
(export.py; its program is dit/cli/export.py), atomic writes (atomic.py), ADM `.npz` sample files
(npz.py), images: the pixel conversion, image folders and PNG grids (images.py).
"""
