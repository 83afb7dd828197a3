"""Every number of the training augmentation in one frozen dataclass, with nnU-Net v2's defaults.

The CPU pipeline (``pipeline.py``) reads these values, and so can a later GPU twin of it: both then
augment alike. A trainer variant changes a value with ``dataclasses.replace(AugmentationParams(), ...)``.
Probabilities named ``p_*`` are per sample unless the name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentationParams:
    # --- spatial: one SpatialTransform (rotation and scaling by resampling a coordinate grid) ---
    p_rotation: float = 0.2  # nnU-Net v2 SpatialTransform p_rotation
    rotation_3d_deg: float = 30.0  # ± about each axis for 3D patches (configure_rotation_dummyDA_mirroring...)
    rotation_2d_deg: float = 180.0  # ± in-plane for 2D patches and for the dummy-2D mode of anisotropic 3D patches
    rotation_2d_elongated_deg: float = 15.0  # ± for 2D patches with max/min edge > elongated_2d_ratio (nnU-Net v2)
    elongated_2d_ratio: float = 1.5  # nnU-Net v2: a 2D patch this elongated gets the small rotation range
    p_rotation_per_axis: float = 1.0  # once a sample rotates, each axis rotates with this probability (nnU-Net)
    p_scaling: float = 0.2  # nnU-Net v2 SpatialTransform p_scaling
    scaling_range: tuple[float, float] = (0.7, 1.4)  # zoom factor (>1 zooms out); nnU-Net v2
    independent_scale_per_axis: bool = False  # one factor for all axes (p_synchronize_scaling_across_axes=1)
    p_elastic: float = 0.0  # nnU-Net v2 turns elastic deformation off (p_elastic_deform=0)
    elastic_alpha: tuple[float, float] = (0.0, 900.0)  # nnU-Net v1 default, used only if p_elastic > 0
    elastic_sigma: tuple[float, float] = (9.0, 13.0)  # nnU-Net v1 default, used only if p_elastic > 0
    # Linear for images, as nnU-Net v2.8 (batchgeneratorsv2 SpatialTransform, mode_image="bilinear"); nnU-Net
    # before batchgeneratorsv2 used cubic splines, which cost this loader about 0.3 s more per brain batch.
    order_image: int = 1
    order_label: int = 1  # labels: linear interpolation of each label's indicator, then argmax (nnU-Net)
    # get_patch_size's scale range, smaller than scaling_range; nnU-Net keeps it from v1 (see its todo), and so
    # do we: with it the sample grows less, and strong zoom-out pulls in some padding (label -1, ignored).
    sample_size_scale_range: tuple[float, float] = (0.85, 1.25)
    anisotropy_threshold: float = 3.0  # 3D patch with max edge / first edge above this: dummy 2D (ANISO_THRESHOLD)

    # --- intensity ---
    p_gaussian_noise: float = 0.1  # nnU-Net v2 GaussianNoiseTransform apply_probability
    gaussian_noise_variance: tuple[float, float] = (0.0, 0.1)  # variance, not standard deviation
    p_gaussian_blur: float = 0.2  # nnU-Net v2 GaussianBlurTransform apply_probability
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # in voxels
    blur_p_per_channel: float = 0.5
    blur_different_sigma_per_channel: bool = True
    p_brightness: float = 0.15  # multiplicative brightness
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)  # intensity range of each channel preserved
    p_low_resolution: float = 0.25  # simulated low resolution: downsample, then upsample back
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    low_resolution_p_per_channel: float = 0.5
    low_resolution_per_channel: bool = True  # a different zoom for each channel
    order_downsample: int = 0
    order_upsample: int = 3
    p_gamma_inverted: float = 0.1  # gamma on the inverted image (darkens bright structures instead)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_retain_stats: bool = True  # restore mean and standard deviation after gamma
    gamma_per_channel: bool = True

    # --- pediatric / acquisition robustness (augment/pediatric.py): all off here, the ``pediatric`` trainer
    # switches them on. Axes: in dummy-2D mode (anisotropic patches) ghosting, motion and thick slices act
    # in-plane only, as the first axis already holds the thick slices. ---
    p_bias_field: float = 0.0  # smooth multiplicative field: image * (1 + field)
    bias_field_amplitude: float = 0.3  # largest |field|, drawn U(0, this); ±30 % is a strong 3 T / 7 T bias
    bias_field_order: int = 3  # Legendre polynomial degree (TorchIO RandomBiasField's default order 3)
    p_contrast_remap: float = 0.0  # random intensity curve inside the head/foreground (infant T1/T2 contrast)
    contrast_remap_points: int = 5  # control points of the piecewise-linear curve over the intensity range
    contrast_remap_p_non_monotone: float = 0.5  # once remapped: unsorted curve values (can swap or invert classes)
    p_motion: float = 0.0  # k-space lines from 2-4 head positions (motion during the scan)
    motion_num_positions: tuple[int, int] = (2, 4)  # inclusive; the k-space centre's position is the reference
    motion_max_shift_voxels: float = 3.0  # translation of the other positions, ± per in-plane axis, in voxels
    p_ghosting: float = 0.0  # periodic k-space modulation: ghosts at multiples of FOV / period
    ghosting_period: tuple[int, int] = (4, 10)  # inclusive; every n-th line (TorchIO RandomGhosting num_ghosts)
    ghosting_intensity: tuple[float, float] = (0.5, 1.0)  # line attenuation (TorchIO RandomGhosting intensity)
    p_thick_slice: float = 0.0  # average slabs of slices along one axis, then resample back
    thick_slice_factor: tuple[int, int] = (2, 5)  # inclusive: 1 mm -> 2-5 mm slices
    # back-interpolation, one drawn per image: 0 repeats the slab (as nnU-Net's resampling of anisotropic cases
    # along their thick axis, order_z 0), 1 interpolates linearly between slab centres
    thick_slice_orders: tuple[int, ...] = (0, 1)

    # --- mirroring (also the test-time mirroring axes at inference) ---
    p_mirror_per_axis: float = 0.5  # every sample, each allowed axis independently (batchgenerators' fixed 0.5)
