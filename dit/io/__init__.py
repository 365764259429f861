"""Files: our checkpoints and their checksums (checkpoint.py), the official and SiT release files
(release.py), export to diffusers and hub folders (export.py), atomic writes, ADM `.npz` sample
files, image folders and PNG grids (files.py).
"""
