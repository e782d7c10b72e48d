"""One package per pipeline step: a plain `run(...)` core and a thin KFP component.

Every component runs on the project image, `PROJECT_IMAGE`, named once in the kernel (onevision/__init__.py)
and re-exported here for the components' `@dsl.component(base_image=PROJECT_IMAGE)`.
"""

from onevision import PROJECT_IMAGE

__all__ = ["PROJECT_IMAGE"]
