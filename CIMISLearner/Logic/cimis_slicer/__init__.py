"""The bridge between 3D Slicer's scene (MRML) and the CIMISLearner engine.

It imports Slicer's C++ classes (``slicer``, ``vtk``) but never Qt, so that everything the module widget does
runs, and is tested, on the ``slicer-core`` wheel without a GUI. One concept per module:

* :mod:`~cimis_slicer.context`       the scene and the Slicer logics the bridge needs (running Slicer or standalone)
* :mod:`~cimis_slicer.volumes`       volume nodes <-> numpy arrays with their IJK-to-RAS geometry
* :mod:`~cimis_slicer.segments`      segmentations: new structures, painted checks, label map export and import
* :mod:`~cimis_slicer.volume_files`  volumes and label maps <-> files, through Slicer's storage nodes
* :mod:`~cimis_slicer.worker_process` the ``cimis worker`` subprocess, polled without blocking, its process tree ended on close
* :mod:`~cimis_slicer.workflow`      Segment, Learn, Cancel, versions: what the widget's buttons do
* :mod:`~cimis_slicer.panel`         the widget's state: which buttons are enabled and what the status line says
* :mod:`~cimis_slicer.dependencies`  what to install on first use: torch via the PyTorch extension, then pip
* :mod:`~cimis_slicer.version_scores` a learned version's pre-activation check, per organ, with flags
* :mod:`~cimis_slicer.slice_views`   offscreen slice views (screenshots, overlay checks)
* :mod:`~cimis_slicer.screenshots`   ``python -m cimis_slicer.screenshots``: the user guide's pictures
* :mod:`~cimis_slicer.sample_data`   the sample CT in Slicer's Sample Data: its files, registration and check

The engine (:mod:`cimis`) never imports this package.
"""

# Tags on segments and attributes on nodes that the bridge writes, so that a later step recognises them.
NEW_STRUCTURE_TAG = "CIMISLearner.NewStructure"  # "true" on segments created by "Add new structures"
NEW_CLASS_TAG = "CIMISLearner.New"  # "true" on result segments of classes the last learn step added
CLASS_VALUE_TAG = "CIMISLearner.LabelValue"  # the class's label value in the model card
VERSION_ATTRIBUTE = "CIMISLearner.Version"  # on result segmentation nodes: the model version that made them
