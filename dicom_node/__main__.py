"""``python -m dicom_node``: the same as the ``dicom-node`` console script."""

import sys

from dicom_node.cli import main

sys.exit(main())
