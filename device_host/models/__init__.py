"""The device's generic model store (paper 4.4.1, resource management): named models as parameter
blobs plus metadata with M / M0 / Mbuf version control. Nothing model-specific: architectures,
training and the validation gate live in task scripts (tasks/_lib/coda)."""
