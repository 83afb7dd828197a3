"""autoseg: self-configuring medical image segmentation.

Array axis order, used everywhere: an image is a numpy array ``(channel, z, y, x)`` exactly as
SimpleITK's ``GetArrayFromImage`` returns it, and every spacing or shape stored by autoseg is in that
same order (``spacing_mm[0]`` is the z spacing). Only ``origin`` and ``direction`` keep ITK's (x, y, z)
order, because they are handed back to SimpleITK unchanged.
"""

__version__ = "0.1.0"
