"""medcl-serve: one machine (often the one with the GPU) runs the models for several napari viewers.

A client uploads a scan's voxels and geometry once and gets a session (``sessions``); each prediction of
that session, of the whole image or a region, runs through one per-device queue (``device_queue``), so two
models never run on one GPU at once; the client fetches the outputs as compressed arrays
(``napari_medcl.transfer``) with the verdict and provenance as JSON. ``app`` is the HTTP service (FastAPI),
``cli`` the command that starts it on uvicorn, ``napari_medcl.remote`` the client.

Needs the ``serve`` extra (fastapi, uvicorn); nothing here is imported by ``import napari_medcl``.
"""
