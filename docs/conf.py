"""Sphinx configuration: the API reference from the numpydoc docstrings, and the Markdown pages."""

import hyperref

project = "hyperref"
author = "hyperref contributors"
copyright = "the hyperref contributors"
version = release = hyperref.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the types are in the numpydoc Parameters sections
autodoc_inherit_docstrings = False  # not torch.nn.Module.forward's text
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "alabaster"
