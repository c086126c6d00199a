"""CoDA task library (paper sections 3-5): the models, features, training, metrics and gates that
the coda_filter, coda_train and coda_infer task scripts share. Tasks declare `libraries = ["coda"]`
and the platform copies these files into each bundle at submit; the cloud imports the same files to
train the global model, so there is one model definition for cloud and device.

Written for the sandbox: no names starting with "_", no file I/O, numpy and MNN only."""
