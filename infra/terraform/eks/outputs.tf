output "gpu_node_group" {
  description = "Name of the GPU managed node group."
  value       = aws_eks_node_group.gpu.node_group_name
}

output "gpu_autoscaling_group" {
  description = "Auto Scaling group behind the GPU node group (carries the cluster-autoscaler tags)."
  value       = aws_eks_node_group.gpu.resources[0].autoscaling_groups[0].name
}

output "gpu_node_labels" {
  description = "Labels on every GPU node; GPU workloads select onevision/pool=gpu."
  value       = local.gpu_node_labels
}

output "gpu_node_taint" {
  description = "Taint on every GPU node; GPU workloads and the GPU operator tolerate it."
  value       = "nvidia.com/gpu=present:NoSchedule"
}
