"""Dense views of one model on images: attention, PCA of patch features, contrastive crops, the CAM family.

Each view is one module (``attention``, ``pca``, ``crops``; ``cam`` is a package) whose ``run_<view>``
drives the one pipeline, ``runner.ViewRunner`` (output check, images, device and normalisation, the
batch loop, the atomic folder and its manifest), and returns a typed ``runner.ViewResult``;
``sheets`` draws the pictures (upsampling, the one heat overlay, contact sheets).
"""
