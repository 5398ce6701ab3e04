// SPDX-License-Identifier: GPL-2.0
/*
 * lab_warn: a kernel WARNING on demand, to test what the lab tells a person when a level's
 * kernel warns (its alerts, `lab status`, the report). Loading it prints `times` WARNINGs
 * from lab_warn_fire(); it then stays loaded and does nothing.
 */
#include <linux/bug.h>
#include <linux/module.h>

static int times = 1;
module_param(times, int, 0444);
MODULE_PARM_DESC(times, "how many WARNINGs to print at load (1 to 8)");

static noinline void lab_warn_fire(int n)
{
	WARN(n > 0, "lab_warn: warning %d, on purpose\n", n);
}

static int __init lab_warn_init(void)
{
	int i;

	for (i = 1; i <= times && i <= 8; i++)
		lab_warn_fire(i);
	return 0;
}

static void __exit lab_warn_exit(void)
{
}

module_init(lab_warn_init);
module_exit(lab_warn_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("A kernel WARNING on demand, for testing the lab");
