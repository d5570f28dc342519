"""The Ray Serve application: FastAPI ingress, auxiliary deployment, backbone deployment."""
