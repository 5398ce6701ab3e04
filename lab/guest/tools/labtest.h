/* labtest.h: what the lab's guest-side test programs share: TAP output, case selection on
 * the command line, the clock, CPU flags. Each program stays one file plus this header. */
#ifndef LABTEST_H
#define LABTEST_H

#include <stdio.h>
#include <string.h>
#include <time.h>

static int tapno;

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One TAP line for a case: ok, not ok with the first failure, or not ok with a setup error. */
static inline int tap_result(const char *name, long checks, long bad, long first, const char *what,
                      double secs, const char *setup_error)
{
    tapno++;
    if (setup_error)
        printf("not ok %d - %s: setup failed: %s\n", tapno, name, setup_error);
    else if (bad)
        printf("not ok %d - %s: %ld of %ld checks stale or wrong (first at iteration %ld: %s)\n",
               tapno, name, bad, checks, first, what);
    else
        printf("ok %d - %s: %ld checks in %.2f s\n", tapno, name, checks, secs);
    fflush(stdout);
    return setup_error || bad;
}

static inline void tap_skip(const char *name, const char *why)
{
    printf("ok %d - %s # SKIP %s\n", ++tapno, name, why);
}

/* Mark the cases named on the command line (all if none; "remap" matches "svm/remap"),
 * print the TAP plan; returns how many, 0 if a name matched nothing. */
static inline int select_cases(int argc, char **argv, int first_arg, const char *const *names, int n,
                        int *selected)
{
    int nsel = 0;
    for (int c = 0; c < n; c++) {
        const char *slash = strchr(names[c], '/');
        selected[c] = first_arg >= argc;
        for (int a = first_arg; a < argc; a++)
            if (!strcmp(argv[a], names[c]) || (slash && !strcmp(argv[a], slash + 1)))
                selected[c] = 1;
        nsel += selected[c];
    }
    if (nsel)
        printf("1..%d\n", nsel);
    return nsel;
}

/* Whether /proc/cpuinfo's first flags line has this flag. */
static inline int cpu_has(const char *flag)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[8192];
    int found = 0;
    size_t n = strlen(flag);
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) != 0)
            continue;
        for (char *p = strstr(line, flag); p; p = strstr(p + 1, flag))
            if (p[-1] == ' ' && (p[n] == ' ' || p[n] == '\n'))
                found = 1;
        break;
    }
    if (f)
        fclose(f);
    return found;
}

#endif
